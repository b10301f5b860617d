"""Where replies go (the chat API, a Postgres table, or the log), idempotently by a reply id derived
from the job. Knows nothing of the queue: the claim runtime decides what a failed delivery means."""

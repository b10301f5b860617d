"""What operators read and may do, over the views of `0005_inspection.sql` (and its successors): the
one surface the CLI, the HTTP API, /metrics and the dashboard share."""

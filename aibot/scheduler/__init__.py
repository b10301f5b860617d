"""Housekeeping that runs on a schedule, once per tick cluster-wide: the jobs (declared once, in
`jobs`) and the APScheduler runner with its tick guard (`runner`)."""

"""`aibot demo`: the product doing its job on one machine, with a report (docs/demo.md)."""

"""Building the request an entity sends to its model (prompt, token budget) and cleaning the reply.

Pure text work on an entity's configuration and a message: no I/O, no database, no HTTP (the one
server call, the tokenizer, is passed in as a function).
"""

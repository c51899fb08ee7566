"""`r1serve pull | list | rm | generate | chat | serve | keys | usage | info | bench | hw`.

    parser.py          the commands and their flags; main()
    engine_flags.py    the model argument and the engine's flags (EngineConfig's fields),
                       sampling flags, the data directory
    commands.py        what each command but serve does
    serve_command.py   `r1serve serve`: engine processes, then the HTTP server

Building the parser loads no torch, FastAPI or load generator: each command imports what it runs.
"""
from r1serve.cli.engine_flags import engine_options
from r1serve.cli.parser import build_parser, main

__all__ = ["build_parser", "engine_options", "main"]

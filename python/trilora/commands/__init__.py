"""The ``trilora`` subcommands, one module each: ``add_parser(subparsers)`` registers the
subcommand and its options, ``run(args) -> int`` runs it. A command module imports no
torch at module level, so ``trilora COMMAND --help`` is instant; the library does the work.
"""

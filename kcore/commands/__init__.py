"""One module per kcore subcommand; each has add_parser(subparsers) and run(args)."""

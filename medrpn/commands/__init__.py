"""One module per `medrpn` subcommand that has its own command line: the parser and a `main` that
calls into the layers (data, model, metrics, outputs, inference, training) once the arguments are
known, and `config_parser`, the reading of a training config that every command shares with
`medrpn fit`. fit / validate / test come from LightningCLI (`medrpn.training.cli`)."""

"""Offline tuner (work in progress)."""


def add_tune_command(subparsers):
    p = subparsers.add_parser("tune", help="offline tile tuner")
    p.set_defaults(func=lambda a: 0)
    return p

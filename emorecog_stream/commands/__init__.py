"""One module per CLI sub-command, each with ``configure(parser)`` and ``main(args) -> int``.

Modules import heavy dependencies (torch, pylsl) inside ``main`` so ``--help`` stays fast.
"""

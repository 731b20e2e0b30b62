"""The pure core: stream roles and shapes, ring buffers, the aligner, physiology and messages.

Nothing here opens a socket, a file or a terminal: adapters feed it, the engine drives it, and
the tests exercise it without any of them.
"""

"""A migration between two hosts: the commit protocol of the two daemons.

``protocol`` is pure (typed messages and one state machine per side, no
I/O); ``remote`` is the source daemon's :class:`Destination` over REST and
the data channel; ``server`` hosts the destination engine behind the
destination daemon's routes.  This package's ``__init__`` imports nothing,
so that importing the pure ``protocol`` pulls in no I/O.
"""

"""Scheme names that code without torch needs too (``fedpara-infer`` picks a client's own test
split for personalised models). :mod:`fedpara.models` holds the full list (``SCHEMES``)."""

# schemes whose models keep part of their state on the device (evaluated per client)
PERSONALISED = ("pfedpara", "fedper")

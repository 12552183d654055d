"""The nlgraph spec library: YAML specs addressable by short name (``hope``, ``equiv/...``)."""

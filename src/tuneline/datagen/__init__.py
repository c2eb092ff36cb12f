"""Data generation helpers for the ``generate`` stage: the travel template generator, the
probe-suite builder, the teacher source and the import parsers."""

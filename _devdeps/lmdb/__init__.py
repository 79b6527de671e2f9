"""device-check stub: LMDB is not used by the dental reproduction."""

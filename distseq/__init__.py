"""distseq."""

"""Run-directory inspection commands (`igdrec prompt`, `igdrec ig show`)."""

"""Small tools with no knowledge of diffusion: atomic writes, file and database locks, redaction of
passwords, cache paths."""

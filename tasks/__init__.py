"""The seven pipeline steps, one module each, plus the catalog (artifacts) and config they share."""

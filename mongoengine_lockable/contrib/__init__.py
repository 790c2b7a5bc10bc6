"""Optional integrations; each module needs a package the core does not."""

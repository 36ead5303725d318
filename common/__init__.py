"""The library every side of prefixd imports: settings, model loading, the prefix-tuning
core, the prefix file format, database models and blob storage."""

"""The store's model: records, codec, limits, errors, validation and BaseStore."""

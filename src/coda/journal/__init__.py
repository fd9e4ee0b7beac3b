"""Storage of events: types, codec, backends."""

"""Segment event -> TikTok events: decoding, triggers, presets, field table, coercion, hashing,
the generated extractors, and the `Mapper` that ties them together per destination."""

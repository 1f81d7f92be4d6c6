"""Getting mapped events to TikTok: the HTTP client and its answer classes, the shared rate
limiter, batching per request key, and the sender that retries, bisects and dead-letters."""

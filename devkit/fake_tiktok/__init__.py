"""A local stand-in for TikTok's Events API (`python -m devkit.fake_tiktok`)."""

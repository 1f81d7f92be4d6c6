"""Developer tooling kept out of the shipped package and image: the fake TikTok Events API,
sample events, the server runners and harnesses shared by the tests, the bench and the demo."""

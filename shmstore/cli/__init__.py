"""The shmstore command (main) and its demo."""

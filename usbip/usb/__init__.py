"""USB itself, apart from USB/IP: the standard (chapter 9) vocabulary every layer speaks."""

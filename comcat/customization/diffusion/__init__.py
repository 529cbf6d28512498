"""Text-to-image side of comcat: the embedded shapes pipeline and its loader."""

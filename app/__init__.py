"""The Gradio UI: a thin layer over the comcat library (to come; see the README)."""

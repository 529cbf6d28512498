"""The Gradio UI: a thin layer over the comcat library (python app.py starts it)."""

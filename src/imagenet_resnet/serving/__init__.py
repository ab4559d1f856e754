"""Using a trained model: loading it, predicting, Grad-CAM, the web page, exports and the Hugging Face Space.
Nothing here imports the trainer."""

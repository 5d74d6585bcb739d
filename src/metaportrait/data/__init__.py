"""Face front-end and training data: detection, crops, dense landmarks, landmark line images, datasets."""

"""The classifier benchmark (SPEC 5): LBP features with k-NN/SVM/RF, and VGG16 on whole images."""

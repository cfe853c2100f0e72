"""ResNet encoders and the SimCLR model (encoder + projection head + online probe)."""

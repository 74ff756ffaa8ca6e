"""What a render writes: atomic files and their names, the streamed pyramidal TIFF, clips, and the checks that no
two posters' files collide."""

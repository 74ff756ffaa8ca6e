"""Planning a render before any weight loads: the request and its checks, the model grid's sizes, the input picture
and mask, the stage plan, the preflight (disk, memory) and the render's identity."""

"""Teachers in: a verified teacher set (its manifest, trained by kdray or imported), the frozen
ensemble, and the teacher-output store that serves the training loop its teachers' outputs."""

"""Reading a grade off a model, shared by training and grading (both import it; it imports neither):
the score head (``head``), expected score and confidence (``distribution``), calibration and the
anchor blend (``calibration``), agreement metrics (``metrics``) and selective grading
(``selective``)."""

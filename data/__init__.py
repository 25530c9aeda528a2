"""The data layer, shared by training, grading and the studio.

- ``rubric``: the schema of a graded submission, a rubric and a grade (pydantic).
- ``loading``: reading and validating graded JSON / JSONL / folders, and rubrics.
- ``markdown``: submissions as the Markdown a student hands in.
- ``prompt_format``: how (rubric, submission) becomes the model's tokens, for training and grading.
- ``store``: the SQLite store (datasets, runs, metrics, checkpoints, grades).
- ``paths``: where things live on disk; ``model_zoo`` / ``tokenizer_offline``: models and the
  GPT-OSS tokenizer resolved from local files.
- ``samples/``: sample graded submissions, rubrics and Markdown submissions written for the studio.
"""

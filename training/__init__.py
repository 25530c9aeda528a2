"""Grader studio: fine-tune and run rubric graders."""

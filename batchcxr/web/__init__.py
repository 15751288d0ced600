"""`batchcxr serve`: the radiologist review app (Flask) over the results database."""

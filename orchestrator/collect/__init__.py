"""A group's end and the results: ensembles, final_results.csv, status records."""

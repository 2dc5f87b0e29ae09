"""What a running app shows: metric names and PromQL (`promql`, no Ray import) and the live chart a
notebook draws from them (`monitor`)."""

"""What people look at: `status`, `watch`, the HTML report, progress bars."""

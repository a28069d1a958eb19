"""Forward passes in a process of their own, fed by the API process over a socket (see ``protocol``)."""

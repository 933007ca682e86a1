"""The DICOM wire: the association server and its transport, received-file spooling, presentation
contexts, TLS, SCU helpers and the Query/Retrieve SCP."""

# filled by the client builder

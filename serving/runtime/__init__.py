"""Model runtimes for the server: numpy in, numpy out, no gRPC.

ort.py       OrtModel: whole sequences through ONNX Runtime
inputs.py    checks every input once, with messages that name the problem
registry.py  loads every model of the repository (ORT + streaming cell)
sessions.py  SessionManager: live sessions, ordering, batching (shared by every protocol)
snapshot.py  session state to disk and back
"""

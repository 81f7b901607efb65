"""The student server (``distill-pipeline serve``): the champion behind the teacher's own API.

An application that calls the teacher through an OpenAI SDK or litellm points ``api_base`` at this
server and ``model`` at a deployment; each deployment's rollout mode decides per request whether
the student, the teacher, or both answer, and every call is logged for the pipeline.
"""

"""The pytest plugins: fixtures, markers, options, outcomes, KTAP/JUnit reporting."""

"""A notebook cell's surroundings in prompts: its language's cells, markdown as comments."""

from lsp_server.prompts.cells import join_cells, markdown_as_comment


def test_markdown_becomes_line_comments_of_the_cells_language():
    cell = "\n## Plot the ages\n\nOne bar per *decade*.  \n\n"
    assert markdown_as_comment(cell, "python") == "# ## Plot the ages\n#\n# One bar per *decade*.\n"
    assert markdown_as_comment(cell, "typescript") == "// ## Plot the ages\n//\n// One bar per *decade*.\n"
    assert markdown_as_comment("Count rows", "sql") == "-- Count rows\n"
    assert markdown_as_comment("Count rows", "brainfuck") is None  # no known line comment: left out
    assert markdown_as_comment(" \n\n", "python") is None


def test_cells_are_joined_in_order_with_the_asked_cells_text_in_its_place():
    cells = [("python", "import pandas as pd\n"), ("markdown", "Load the data"), ("r", "x <- 1"),
             ("python", "   \n"), ("python", "df = pd.read_csv('a.csv')"), ("markdown", " "), ("python", "df.head()\n\n")]
    text, offset = join_cells(cells, 4, "df = pd.read_csv('b.csv')")
    assert text == "import pandas as pd\n\n# Load the data\n\ndf = pd.read_csv('b.csv')\n\ndf.head()\n\n"
    assert text[offset:].startswith("df = pd.read_csv('b.csv')")
    # the asked cell is in its place even when blank; the first cell has nothing before it
    assert join_cells(cells, 3, "") == ("import pandas as pd\n\n# Load the data\n\n\n\ndf = pd.read_csv('a.csv')\n\ndf.head()\n\n", 38)
    assert join_cells(cells, 0, "import numpy\n") == ("import numpy\n\n# Load the data\n\ndf = pd.read_csv('a.csv')\n\ndf.head()\n\n", 0)
    # a markdown cell asked about sees the other markdown cells as they are, and no code
    assert join_cells(cells, 1, "Load it") == ("Load it", 0)

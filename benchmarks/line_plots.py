"""Line plots of benchmark curves: matplotlib when it is installed, otherwise PIL.

Our machines have no matplotlib, so the PIL drawing is what committed results folders show; it
draws the same content: one panel per group, x an accuracy in [0, 1], y over the data's range
(shared by the panels, so they compare), one colour with markers per series, and one legend.

``panels`` is ``{panel title: {series label: [(x, y), ...]}}``, points in drawing order; a
series keeps its colour in every panel (the colour of its first appearance).
"""

import math

# matplotlib's default cycle (tab10), so that both backends colour a series alike.
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
X_RANGE = (-0.05, 1.05)  # a margin, so that points at accuracy 0 or 1 do not sit on the frame
X_TICKS = (0.0, 0.5, 1.0)
# PIL layout, in pixels: each panel's plot area and the room around it for titles and labels
# (GAP between panels holds the next panel's y tick labels).
PANEL_W, PANEL_H = 300, 220
LEFT, TOP, BOTTOM, GAP = 64, 30, 44, 48
MARKER = 3  # marker radius
# PIL's default font has no glyphs for these (it draws boxes); our labels use them.
ASCII = str.maketrans({"→": "->", "λ": "lambda", "α": "alpha", "±": "+/-", "Δ": "d"})


def series_labels(panels):
    """Every series label, in order of first appearance (its colour is PALETTE at that index)."""
    return list(dict.fromkeys(label for series in panels.values() for label in series))


def y_range(panels):
    """``(low, high)`` of the y axis: the data's range with a margin of 8% on each side."""
    ys = [y for series in panels.values() for points in series.values() for _, y in points]
    low, high = min(ys), max(ys)
    margin = 0.08 * (high - low) or 0.05  # flat data still gets a visible band
    return low - margin, high + margin


def nice_ticks(low, high, count=5):
    """About ``count`` round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) in [low, high]."""
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.ceil(low / step) * step
    return [round(first + i * step, 10) for i in range(int((high - first) / step + 1e-9) + 1)]


def panel_box(index):
    """``(left, top, right, bottom)`` pixels of panel ``index``'s plot area in the PIL image."""
    left = LEFT + index * (PANEL_W + GAP)
    return left, TOP, left + PANEL_W, TOP + PANEL_H


def to_pixel(index, x, y, y_low, y_high):
    """The PIL pixel of data point ``(x, y)`` in panel ``index`` (x over X_RANGE, y over ``(y_low, y_high)``)."""
    left, _, _, bottom = panel_box(index)
    px = left + (x - X_RANGE[0]) / (X_RANGE[1] - X_RANGE[0]) * PANEL_W
    py = bottom - (y - y_low) / (y_high - y_low) * PANEL_H
    return round(px), round(py)


def line_plot(path, panels, x_label, y_label):
    """Write the PNG ``path``: one panel per entry of ``panels`` (see the module's docstring)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        pil_line_plot(path, panels, x_label, y_label)
        return
    colours = {label: [c / 255 for c in PALETTE[i % len(PALETTE)]] for i, label in enumerate(series_labels(panels))}
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 0.6, 3.2), squeeze=False, sharey=True)
    for ax, (title, series) in zip(axes[0], panels.items()):
        for label, points in series.items():
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", ms=3, color=colours[label], label=label)
        ax.set(title=title, xlabel=x_label, xlim=X_RANGE, xticks=X_TICKS, ylim=y_range(panels))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(y_label)
    # One legend for all panels, outside the last one (bbox_inches="tight" makes room for it).
    handles = {label: line for ax in axes[0] for line, label in zip(*ax.get_legend_handles_labels())}
    axes[0][-1].legend(handles.values(), handles.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def pil_line_plot(path, panels, x_label, y_label):
    """``line_plot`` drawn with PIL (matplotlib is not installed)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    panels = {title.translate(ASCII): {label.translate(ASCII): points for label, points in series.items()}
              for title, series in panels.items()}
    labels = series_labels(panels)
    colours = {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}
    legend_x = panel_box(len(panels) - 1)[2] + 20  # the legend: right of the last panel
    width = legend_x + 28 + max(int(font.getlength(label)) for label in labels) + 10
    height = max(TOP + PANEL_H + BOTTOM, TOP + 16 * len(labels) + 10)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    y_low, y_high = y_range(panels)
    for index, (title, series) in enumerate(panels.items()):
        draw_axes(draw, font, index, title, x_label.translate(ASCII), y_low, y_high)
        # Lines first, then markers, so that no line hides a point.
        for label, points in series.items():
            if len(points) > 1:
                draw.line([to_pixel(index, x, y, y_low, y_high) for x, y in points], fill=colours[label], width=2)
        for label, points in series.items():
            for x, y in points:
                draw_marker(draw, to_pixel(index, x, y, y_low, y_high), colours[label])
    for row, label in enumerate(labels):
        y = TOP + 16 * row + 6
        draw.line([(legend_x, y), (legend_x + 20, y)], fill=colours[label], width=2)
        draw_marker(draw, (legend_x + 10, y), colours[label])
        draw.text((legend_x + 28, y), label, fill="black", font=font, anchor="lm")
    paste_vertical_text(img, font, y_label.translate(ASCII), (4, TOP + PANEL_H // 2))
    img.save(path)


def draw_marker(draw, centre, colour):
    """A filled disc of radius MARKER at pixel ``centre``."""
    px, py = centre
    draw.ellipse([px - MARKER, py - MARKER, px + MARKER, py + MARKER], fill=colour)


def draw_axes(draw, font, index, title, x_label, y_low, y_high):
    """Frame, light grid, ticks and tick labels, title and x label of panel ``index``."""
    left, top, right, bottom = panel_box(index)
    for x in X_TICKS:
        px, _ = to_pixel(index, x, y_low, y_low, y_high)
        draw.line([(px, top), (px, bottom)], fill=(230, 230, 230))
        draw.line([(px, bottom), (px, bottom + 4)], fill="black")
        draw.text((px, bottom + 6), f"{x:g}", fill="black", font=font, anchor="mt")
    for y in nice_ticks(y_low, y_high):
        _, py = to_pixel(index, X_RANGE[0], y, y_low, y_high)
        draw.line([(left, py), (right, py)], fill=(230, 230, 230))
        draw.line([(left - 4, py), (left, py)], fill="black")
        draw.text((left - 6, py), f"{y:g}", fill="black", font=font, anchor="rm")
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text(((left + right) // 2, top - 8), title, fill="black", font=font, anchor="ms")
    draw.text(((left + right) // 2, bottom + 24), x_label, fill="black", font=font, anchor="mt")


def paste_vertical_text(img, font, text, left_middle):
    """Draw ``text`` turned 90° (reading upwards) with its left edge and vertical middle at ``left_middle``."""
    from PIL import Image, ImageDraw

    x0, y0, x1, y1 = font.getbbox(text)
    strip = Image.new("RGB", (x1 + 2, y1 + 2), "white")
    ImageDraw.Draw(strip).text((1, 1), text, fill="black", font=font)
    strip = strip.rotate(90, expand=True)
    img.paste(strip, (left_middle[0], left_middle[1] - strip.height // 2))
